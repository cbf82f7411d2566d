"""The shared core: what training, the clients and the servers all need from a checkpoint and a person's
frames (the model with its loss, crops, frames, scores), written once over `model/` and `data/`.
"""
