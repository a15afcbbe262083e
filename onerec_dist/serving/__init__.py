"""Think-Ahead serving (OneRec-Think, arXiv:2510.11639, Sec. 4.4): the offline rationale + item-prefix cache and the
online constrained completion (think_ahead.py), the request schema of the HTTP endpoint (api.py). Pure: the Ray
parts (sharded cache build, the Ray Serve application) live in onerec_dist/distributed/."""
