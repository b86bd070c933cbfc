#!/bin/bash
# Builds benchmarks/nearest_profile.cpp against kernels/cpu (each ISA file with its CMake flags,
# plus -g) and runs it; with PERF=1, under `perf record -e cpu-clock` followed by the report's
# top functions (the shares of the search's time per kernel function).
#
#   benchmarks/nearest_profile.sh N K D REPS [fast]         # e.g. 16384 1024 256 30
#   PERF=1 OMP_NUM_THREADS=2 benchmarks/nearest_profile.sh 16384 1024 32 40
#   OMP_NUM_THREADS=2 benchmarks/nearest_profile.sh ceiling 256 7   # the micro-tile's loop alone, register FMAs alone
# OUT (default: a temporary folder) keeps the binary and perf.data.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out/obj"
for f in "$root"/kernels/cpu/*.cpp; do
  b=$(basename "$f" .cpp)
  case $b in
    *_avx512) fl="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma -mf16c -mbmi2" ;;
    *_avx512bf16) fl="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16" ;;
    *_amx) fl="-mavx512f -mavx512bw -mavx512vl -mavx512dq -mamx-tile -mamx-bf16" ;;
    *_avx2) fl="-mavx2 -mfma -mf16c -mbmi2" ;;
    *) fl="" ;;
  esac
  # shellcheck disable=SC2086
  ${CXX:-g++} -std=c++17 -O3 -g -fno-math-errno -fno-trapping-math -fopenmp $fl -I"$root/kernels/include" \
    -c "$f" -o "$out/obj/$b.o" &
done
wait
${CXX:-g++} -std=c++17 -O2 -g -fopenmp -I"$root/kernels/include" "$root/benchmarks/nearest_profile.cpp" \
  "$out"/obj/*.o -o "$out/nearest_profile"
if [ "${PERF:-0}" = 1 ]; then
  perf record -q -e cpu-clock -o "$out/perf.data" "$out/nearest_profile" "$@"
  perf report -i "$out/perf.data" --no-children --sort dso,sym 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
else
  "$out/nearest_profile" "$@"
fi
