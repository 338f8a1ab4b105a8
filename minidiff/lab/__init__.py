"""The lab: what minidiff has for learning beyond the models and the loop.

    gaussian_mixture.py   the exact denoiser of a Gaussian mixture (what a perfect model would predict)
    prototypes.py         eight small pictures (circle, square, ..., boat): the mixture's means
    accuracy.py           every scheduler against the exact probability-flow ODE: errors, orders, distributions
    trajectories.py       the exact paths from noise to data, and the points a scheduler steps through
    demo.py               `minidiff demo`: the tables and pictures of accuracy.py, offline
    notebooks.py          the tutorials as Jupyter notebooks (`minidiff tutorials --export`)
"""
