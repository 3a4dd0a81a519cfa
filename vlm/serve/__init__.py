"""Serving: a continuous-batching engine over the trained VLM, and the front ends that feed it
(an OpenAI-compatible HTTP server, a terminal chat, an offline batch runner).

`vlm.serve.api` holds the types they share; `vlm.serve.prompt` turns a conversation into the
model's prompt with the checkpoint's own processor and template.
"""
