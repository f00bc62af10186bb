"""Tezzeret, the forge (DESIGN.md section 8): compile blueprints into signed kernel artifacts and
load them back, verified.

    toolchain   what a kernel is built with; device targets, config hashes, kernel ids
    compile     one compile job, run in the forge's sandboxed child: weights and AOT-compiled code
    artifact    the signed manifest; sealing a job's files into Urza's store
    loader      verify and rebuild a kernel (Kasmina, Urabrask)

Importing these modules does not import torch, the catalog or the signing library; the
functions that need them do.
"""
