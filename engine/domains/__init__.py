"""The real domain handlers: device, memory, model, inference and postprocessing.

They know nothing of the event store; they register with the handler registry through the same
`register(registry)` mechanism as any other handler module named in config.toml.
"""

from engine.run.handlers import Registry


def register(registry: Registry) -> None:
    from engine.domains import device, inference, model, postprocessing

    registry.add("device_discovery", device.discovery_step)
    registry.add("model_loading", model.loading_step)
    registry.add("inference_generation", inference.generation_step, compatibility=inference.compatibility,
                 check=inference.submit_check, output_size=inference.output_size)
    registry.add("postprocessing_enhancement", postprocessing.processing_step, output_size=postprocessing.output_size)
    registry.add_params_check(postprocessing.check_presets)
