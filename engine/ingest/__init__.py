"""Where a job file becomes a session: the watched inbox (`inbox`), one file as it was read
(`seen`), the job file schema (`jobs`), input images (`inputs`) and the checks that resolve a job
against workflows, models and devices (`intake`). Recording it is `engine.commands.submit`."""
