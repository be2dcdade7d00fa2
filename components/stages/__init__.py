"""The chain's stages, one module each: the stage's driver, `run(cfg)` (what pipelines/<name>.py runs with the
config its command line composes), and `stage(wiring)`, the `Stage` that pipelines/end_to_end.py lists (how its
config is wired from the upstream stages' outputs, what it hands on, how a cached run is checked).

A new stage is a module here, its conf/<name>.yaml, a pipelines/<name>.py of a few lines and an entry in
end_to_end's list.
"""
