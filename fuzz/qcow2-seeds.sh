#!/usr/bin/env bash
# Regenerates fuzz/corpus/qcow2/: small qcow2 images made by qemu-img and
# qemu-io (512-byte and 4 KiB clusters keep them a few KiB), each behind
# the target's mode byte (bit 0: writable, bit 1: add a persistent bitmap).
# Covers: data and zero clusters, compressed clusters, extended L2
# (subclusters), 1- and 64-bit refcounts, an internal snapshot, a
# persistent dirty bitmap, a backing-file name, a dirty (lazy-refcounts) image.
set -euo pipefail
out=${1:-fuzz/corpus/qcow2}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mk() { # name mode create-options [qemu-io commands...]
  local name=$1 mode=$2 opts=$3; shift 3
  qemu-img create -q -f qcow2 -o "$opts" "$tmp/$name" 1M
  for c in "$@"; do qemu-io -f qcow2 -c "$c" "$tmp/$name" >/dev/null; done
  { printf "\\x$(printf %02x "$mode")"; cat "$tmp/$name"; } >"$out/$name"
}
mkdir -p "$out"
mk plain-512 1 cluster_size=512 "write -P 0x11 0 4k" "write -z 8k 2k"
mk plain-4k 0 cluster_size=4096 "write -P 0x22 0 16k" "write -P 0x23 512k 4k"
mk compressed 1 cluster_size=4096 "write -c -P 0x33 0 4k" "write -c -P 0x34 64k 4k"
mk extended-l2 1 cluster_size=16384,extended_l2=on "write -P 0x44 0 2k" "write -z 4k 1k"
mk refcount-1 1 cluster_size=512,refcount_bits=1 "write -P 0x55 0 1k"
mk refcount-64 0 cluster_size=512,refcount_bits=64 "write -P 0x56 0 1k"
mk lazy 1 cluster_size=512,lazy_refcounts=on "write -P 0x66 0 1k"
qemu-img create -q -f raw "$tmp/base.raw" 1M
mk backing 0 cluster_size=512,backing_file=base.raw,backing_fmt=raw "write -P 0x77 0 512"
qemu-img create -q -f qcow2 -o cluster_size=512 "$tmp/snap" 1M
qemu-io -f qcow2 -c "write -P 0x88 0 1k" "$tmp/snap" >/dev/null
qemu-img snapshot -c s1 "$tmp/snap"
qemu-io -f qcow2 -c "write -P 0x89 0 512" "$tmp/snap" >/dev/null
{ printf '\x01'; cat "$tmp/snap"; } >"$out/snapshot"
qemu-img create -q -f qcow2 -o cluster_size=4096 "$tmp/bitmap" 1M
qemu-img bitmap --add "$tmp/bitmap" b0
qemu-io -f qcow2 -c "write -P 0x99 0 8k" "$tmp/bitmap" >/dev/null
qemu-img bitmap --add --disable "$tmp/bitmap" b1
{ printf '\x03'; cat "$tmp/bitmap"; } >"$out/bitmap"
ls -l "$out"
