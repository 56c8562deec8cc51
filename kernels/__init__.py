"""Triton kernels of mm1-moe, installed as ``mm1_moe.kernels`` (see setup.py's package_dir).

One op per file, each with its plain-torch reference in ``reference.py``. Modules under
``mm1_moe/`` never import ``triton`` directly: they call the functions exported here.
"""
