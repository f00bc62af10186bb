"""The asynchronous innovation pipeline (DESIGN.md sections 8 and 9): `tezzeret` compiles
blueprints into signed kernel artifacts, `urabrask` characterizes them."""
