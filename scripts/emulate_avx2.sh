#!/usr/bin/env bash
# Run a command as it would run on an AVX2-only x86-64 CPU (Haswell: no AVX-512, no bf16), on any
# x86-64 Linux host, for checking loraplex's CPU dispatch without such a machine:
#   - qemu-user (`-cpu Haswell`) executes the Python process, so an AVX-512 instruction anywhere in
#     it (torch, llama.cpp, loraplex's C kernel) dies with SIGILL as on the real CPU;
#   - a private mount namespace shows a /proc/cpuinfo whose flags have no AVX-512/AMX/VNNI, so code
#     that reads the flags (bf16 choice, kernel cache key, scripts/install.sh) sees that CPU too;
#   - the C compiler driver runs under the same emulation, so `-march=native` means Haswell.
# Child processes (subprocess, spawn) run natively: use it for in-process work only.
# Needs root (unshare -m) and Debian's qemu-user. About 10-20x slower than native.
#   sudo bash scripts/emulate_avx2.sh .venv/bin/python -m pytest -q tests/test_engine.py
set -euo pipefail
command -v qemu-x86_64 >/dev/null || { echo "needs qemu-user: apt-get install qemu-user" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || { echo "an x86-64 host is needed" >&2; exit 2; }
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
drop='^(avx512.*|avx_vnni.*|amx.*|avx_ifma|avx_ne_convert|vaes|vpclmulqdq|gfni|sha_ni)$'
awk -v drop="$drop" '/^flags/ { out = "flags\t\t:"; for (i = 3; i <= NF; i++) if ($i !~ drop) out = out " " $i; print out; next } { print }' \
    /proc/cpuinfo > "$dir/cpuinfo"
printf '#!/bin/sh\nexec qemu-x86_64 -cpu Haswell "%s" "$@"\n' "$(command -v gcc || command -v cc)" > "$dir/cc"
chmod +x "$dir/cc"
exe=$(command -v "$1"); shift
# qemu warns once per feature TCG lacks (invpcid, rtm): noise, not errors
unshare -m bash -c 'mount --bind "$0/cpuinfo" /proc/cpuinfo && CC="$0/cc" qemu-x86_64 -cpu Haswell "$@" 2> >(grep -v "TCG doesn.t support" >&2)' \
    "$dir" "$exe" "$@"
