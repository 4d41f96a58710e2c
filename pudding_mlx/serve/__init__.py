"""`pudding serve`: the OpenAI-compatible local server, its generation engine and the prompt
cache kept between requests."""
