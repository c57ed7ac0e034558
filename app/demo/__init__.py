"""``meshctl demo``: a living mesh on this machine (see :mod:`app.demo.runner`)."""
