#!/usr/bin/env bash
# Writes the seed corpora under fuzz/corpus/<target>/ from the hand-written
# inputs in fuzz/seeds/ (protobuf text, JSON) and a few generated files
# (safetensors, zstd frames). Needs protoc and zstd; run again after editing
# a seed. Regression inputs (fuzz/corpus/<target>/regress-*) are kept.
set -euo pipefail
cd "$(dirname "$0")"
seeds=seeds
out=corpus
for t in submit_request checkpoint_path safetensors checkpoint_meta tinker_json tinker_proto loops_json zstd_body; do
  mkdir -p "$out/fuzz_$t"
  find "$out/fuzz_$t" -name 'seed-*' -delete
done

# Protobuf seeds: "<message> <file>.txtpb" encoded with protoc.
encode() {  # target message import_dir proto seed
  local name
  name=$(basename "$5" .txtpb)
  protoc --encode="$2" -I "$3" "$4" < "$5" > "$out/fuzz_$1/seed-$name"
}
for f in "$seeds"/submit_request/*.txtpb; do
  encode submit_request lathe.v1.SubmitRequest ../proto lathe/v1/service.proto "$f"
done
for f in "$seeds"/tinker_proto/*.txtpb; do
  encode tinker_proto lathe.http.tinker.ForwardBackwardRequest ../http tinker_wire.proto "$f"
done

# Text seeds, one per line: "<route byte in hex> <body>" (an empty route: none).
lines() {  # target file
  local i=0 route body
  while IFS= read -r line; do
    [ -z "$line" ] && continue
    route=${line%% *}; body=${line#* }
    if [ "$route" = "-" ]; then printf '%s' "$body"; else printf "\\x$route%s" "$body"; fi > "$out/fuzz_$1/seed-$i"
    i=$((i + 1))
  done < "$2"
}
for t in checkpoint_path checkpoint_meta tinker_json loops_json; do lines "$t" "$seeds/$t.txt"; done

# safetensors: route 0 + a file written by lathe's own byte layout (8-byte
# little-endian header length, JSON header, data); route 1 + an index.
st() {  # name header-json data-bytes(printf escapes)
  local n=${#2}
  { printf '\x00'
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x\\x00\\x00\\x00\\x00' $((n & 255)) $((n >> 8 & 255)) $((n >> 16 & 255)) $((n >> 24 & 255)))"
    printf '%s' "$2"; printf "$3"; } > "$out/fuzz_safetensors/seed-$1"
}
st f32 '{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' '\x00\x00\x80\x3f\x00\x00\x00\x40'
st two '{"__metadata__":{"format":"pt"},"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}' '\x01\x00\x00\x00\x00\x00\x00\x00\x80\x3f\x00\x40'
st scalar '{"s":{"dtype":"U8","shape":[],"data_offsets":[0,1]},"e":{"dtype":"F16","shape":[0,3],"data_offsets":[1,1]}}' '\x07'
printf '\x01%s' '{"metadata":{"total_size":12},"weight_map":{"x":"a.safetensors","y":"a.safetensors"}}' \
  > "$out/fuzz_safetensors/seed-index"
printf '\x01%s' '{"weight_map":{"x":"a.safetensors"}}' > "$out/fuzz_safetensors/seed-index-one"

# zstd: frames of a JSON body, of two concatenated frames, of a run of zeros.
body='{"model_id":"run-1","seq_id":2,"forward_backward_input":{"loss_fn":"cross_entropy","data":[]}}'
printf '%s' "$body" | zstd -q -c > "$out/fuzz_zstd_body/seed-json"
{ printf 'a' | zstd -q -c; printf 'b' | zstd -q -c; } > "$out/fuzz_zstd_body/seed-two-frames"
head -c 4096 /dev/zero | zstd -q -c --no-check > "$out/fuzz_zstd_body/seed-zeros"
echo "corpora written under fuzz/$out/"
