"""Capacity planning: will a model fit, and how fast will it run, on this hardware?

Pure Python over metadata; never imports torch or the engine. The engine and the server use
`deskpod.plan.capacity` (check_fits, kv_blocks_for) so that what `deskpod plan` prints and what the
engine allocates come from the same arithmetic.

    shape.py      ModelShape: a model's dimensions and parameter counts
    builtins.py   published configurations by name
    precision.py  bits per weight of each scheme
    weights.py    weight bytes by part, and what one decode step reads
    source.py     MODEL argument → shape (+ exact bytes from a file)
    devices.py    hardware profiles, this machine's probe, free memory
    capacity.py   memory plan, admission control, KV blocks
    speed.py      roofline prefill / decode estimates
    planner.py    all of it for one model on one profile
    cli.py        `deskpod plan`
"""
