"""Choosing the prior (and the regression noise): the evidence, one-pass prior grids."""
