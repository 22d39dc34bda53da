"""Research studies built on the product (convergence comparison, token scaling and its report,
update RMS, planner calibration): they import ``launch.trainer``/``launch.data``; nothing in the
product imports them, and the wheel does not ship them.
"""
