"""Generation and blank infilling: prompt inputs, decoding strategies, the decode loop, prompts, the API."""
