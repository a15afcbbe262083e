"""The ablation harness of `onerec ablation row=<row>`: rows as data (rows.py), running a row (run_row.py), the
table with paired intervals, published reference rows and a plot (table.py)."""
