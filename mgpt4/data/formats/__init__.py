"""Readers of the annotation formats people bring their own data in: LLaVA JSON / JSONL and ShareGPT /
OpenAI-messages JSONL (`records` normalises an entry, `annotations` indexes and checks a file,
`stream` reads a source as the shard stream does)."""
