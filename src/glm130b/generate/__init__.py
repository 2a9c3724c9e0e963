"""Generation and blank infilling: prompts and inputs, decoding strategies, the decode loop, the API."""
