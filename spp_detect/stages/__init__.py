"""One orchestration module per CLI verb: read artefacts, loop with tqdm, write artefacts."""
