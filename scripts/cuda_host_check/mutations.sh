#!/usr/bin/env bash
# Does the host check (mma_host_check.cpp) catch bugs? Applies deliberate bugs to a copy of
# csrc/cuda/lor2c_mma.cuh, one at a time, builds the check against each and expects it to FAIL.
# Prints CAUGHT / MISSED per mutation; exits 1 if any was missed. Takes ~1 min per mutation.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CUDA_INCLUDE="$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 |
                sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -n 1 | sed 's/ *$//')"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
# name | sed expression applied to lor2c_mma.cuh
MUTATIONS=(
  "fwd: t_lo product dropped|s/wmma::load_matrix_sync(a, tl + mt \* 16 \* kLdt + kk \* 16, kLdt);/wmma::load_matrix_sync(a, th + mt * 16 * kLdt + kk * 16, kLdt);/"
  "fwd: A lo product dropped|s/wmma::load_matrix_sync(b, Al + nt/wmma::load_matrix_sync(b, Ah + nt/"
  "fwd: K-split stride|s/for (int kk = ks; kk < kTile \/ 16; kk += L::kKS)/for (int kk = ks; kk < kTile \/ 16; kk += 1)/"
  "g: dB column tile|s/Gh + kk \* 16 \* kMmaLdh + warp \* 16, kMmaLdh/Gh + kk * 16 * kMmaLdh + (warp ^ 1) * 16, kMmaLdh/"
  "g: u copies not summed|s/for (int h = 0; h < L::kKU; ++h) s += us/for (int h = 0; h < 1; ++h) s += us/"
  "x: u.T layout|s/uth + kk \* 16 \* kLdu + nt \* 16/uth + nt * 16 * kLdu + kk * 16/"
  "x: keep bits of the neighbour group|s/const unsigned keep = bits\[row \* (kTile \/ 8) + grp\];/const unsigned keep = bits[row * (kTile \/ 8) + (grp ^ 1)];/"
  "x: dx epilogue row|s/const int row = mt \* 16 + rr;/const int row = mt * 16 + (rr ^ 1);/"
  "x: partial last row step|s/const int nsub = static_cast<int>((nrows + kMmaSubX - 1) \/ kMmaSubX);/const int nsub = static_cast<int>(nrows \/ kMmaSubX);/"
  "x: barrier after staging removed|0,/if (do_dx \&\& nrc > 1) stage_A_mma<W, RT>(ah, al, A, rc, r, col0, d_in);/{n;s/__syncthreads();/\/\/ removed/}"
  "tile: group column|s/\*reinterpret_cast<Vec8<T>\*>(S + row \* kMmaLdh + 8 \* grp) = w;/*reinterpret_cast<Vec8<T>*>(S + row * kMmaLdh + 8 * (grp ^ (row \& 1))) = w;/"
)
status=0
for m in "${MUTATIONS[@]}"; do
  name="${m%%|*}"
  expr="${m#*|}"
  mkdir -p "$TMP/csrc/cuda"
  cp "$ROOT"/csrc/*.h "$TMP/csrc/"
  cp "$ROOT"/csrc/cuda/* "$TMP/csrc/cuda/" 2>/dev/null
  sed -i "$expr" "$TMP/csrc/cuda/lor2c_mma.cuh"
  if cmp -s "$TMP/csrc/cuda/lor2c_mma.cuh" "$ROOT/csrc/cuda/lor2c_mma.cuh"; then
    echo "NOT APPLIED  $name (the pattern no longer matches)"
    status=1
    continue
  fi
  if ! g++ -std=c++20 -O1 -Wno-unknown-pragmas -I "$TMP/csrc" -isystem "$CUDA_INCLUDE" \
       "$ROOT/scripts/cuda_host_check/mma_host_check.cpp" -o "$TMP/check" 2> "$TMP/build.log"; then
    echo "BUILD FAIL   $name"; head -5 "$TMP/build.log"; status=1; continue
  fi
  if timeout 600 "$TMP/check" --quick > "$TMP/run.log" 2>&1 &&
     timeout 600 "$TMP/check" --quick --reverse >> "$TMP/run.log" 2>&1; then
    echo "MISSED       $name"
    status=1
  else
    echo "CAUGHT       $name: $(grep -m1 -E 'FAIL' "$TMP/run.log" | cut -c1-150)"
  fi
done
exit $status
