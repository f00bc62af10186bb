"""Urabrask, the characterization gauntlet (`esper bench`, DESIGN.md section 9, HLD Appendix E).

gauntlet.py (stages 1-2, in the sandboxed child), worker.py (the child), sandbox.py (runs it
under limits), tags.py (stage 3), risk.py (stage 4), bench.py (the daemon).
"""
