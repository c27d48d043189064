"""`engine serve`: the HTTP door (FastAPI on uvicorn). Thin over the one submit path
(`engine.commands`) and the one read API (`engine.queries`): the native API under /v1 (`native`),
OpenAI's images API (`openai_images`), AUTOMATIC1111's /sdapi/v1 (`a1111`), with what they share
(`shared`: submitting, waiting for a session, uploaded images) and the process (`serve`)."""
