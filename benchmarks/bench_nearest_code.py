"""Exact nearest-code search: vqtok cpp (exact mode, and the certified fast mode cpp_fast: AMX-BF16
scores with exact re-decision, same answer) vs FAISS IndexFlatL2 (k=1), torch cdist / chunked addmm
and vector-quantize-pytorch. Median wall time, GFLOP/s (2 N K D / t), ratio vs FAISS, agreement
with the exact answer and peak extra memory. Prints a table; --json writes rows + config.

    .venv/bin/python benchmarks/bench_nearest_code.py             # N=16384, D {8,16,32,256}, K {1024,16384,65536} (+262144 fused)
    .venv/bin/python benchmarks/bench_nearest_code.py --quick     # tiny grid, < 30 s (make demo)
    .venv/bin/python benchmarks/bench_nearest_code.py --backends cpp,cpp_fast,faiss --json out.json
    .venv/bin/python benchmarks/bench_nearest_code.py --backends cpp,cpp_fast --data lowrank   # clustered inputs
"""

from vqtok.bench.nearest import main

if __name__ == "__main__":
    main()
