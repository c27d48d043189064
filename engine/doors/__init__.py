"""The doors, each thin over one submit path (`engine.commands`) and one read API
(`engine.queries`): the CLI (`cli`), the JSON-lines stdio worker (`stdio`), the live view of
`engine run` (`live`), the demo (`demo`) and the HTTP door of `engine serve` (`http`)."""
