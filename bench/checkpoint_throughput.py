"""Checkpoint save and load throughput against plain file I/O of the same bytes.

Starts a coordinator and mpirun dp_workers (--layout, default tp=2 on the
dense bench model, full fine-tuning so the checkpoint holds weights and both
Adam moments), takes one training step, then times save_state and
load_state_with_optimizer through the service (op round trip). In the same
run it writes the same number of bytes to one file sequentially (8 MiB
writes, fsync, as the checkpoint's shards are) and reads them back. Both reads
come from the page cache unless the machine is short of memory; the ratio
compares like with like.

  .venv/bin/python bench/checkpoint_throughput.py [--model dense] [--layout tp=2] [--lora-rank 0]
"""
import argparse
import os
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_throughput as tt  # noqa: E402
from deployment import deployment, serving_run, stubs, wait  # noqa: E402


def drop_caches():
    """Empties the page cache (root only), so reads come from the disk; False if not allowed."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def plain_io(path, nbytes, cold):
    block = os.urandom(8 << 20)
    start = time.perf_counter()
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    if cold:
        drop_caches()
    start = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(8 << 20):
            pass
    read_s = time.perf_counter() - start
    os.remove(path)
    return write_s, read_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["dense", "moe2"], default="dense")
    ap.add_argument("--layout", default="tp=2")
    ap.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    tt.add_path_args(ap)
    args = ap.parse_args()
    model = tt.cached_model(args.cache, args.model)
    layout = dict(kv.split("=") for kv in args.layout.split(","))
    with tempfile.TemporaryDirectory(dir=os.path.join(tt.ROOT, "runs")) as tmp:
        stubs(os.path.join(tmp, "stubs"))
        root = os.path.join(tmp, "ckpt")
        with deployment(args.build_dir, model, layout, 1, tmp, checkpoint_root=root) as address:
            stub, pb, types, run = serving_run(address, args.lora_rank)
            d = types.Datum()
            d.model_input.chunks.add().encoded_text.tokens = struct.pack("<16i", *range(16))
            for key, dtype, data in (("target_tokens", types.INT64, (1).to_bytes(8, "little") * 16),
                                     ("weights", types.FLOAT32, b"\x00\x00\x80\x3f" * 16)):
                t = d.loss_fn_inputs[key]
                t.dtype, t.data = dtype, data
                t.shape.append(16)
            seq = iter(range(1, 100))
            submit = lambda **op: wait(stub, pb, stub.Submit(pb.SubmitRequest(run_id=run, seq_id=next(seq), **op),
                                                                timeout=60).op_id)
            submit(forward_backward=types.ForwardBackwardInput(loss_fn="cross_entropy", data=[d]))
            submit(optim_step=types.AdamParams(learning_rate=1e-5))
            start = time.perf_counter()
            path = submit(save_state=pb.SaveStateOp(name="bench")).save_state.path
            save_s = time.perf_counter() - start
            folder = os.path.join(root, run, "weights", "bench")
            nbytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(folder) for f in fs)
            cold = drop_caches()
            start = time.perf_counter()
            submit(load_state_with_optimizer=pb.LoadStateOp(path=path))
            load_s = time.perf_counter() - start
            warm_start = time.perf_counter()
            submit(load_state_with_optimizer=pb.LoadStateOp(path=path))
            warm_load_s = time.perf_counter() - warm_start
            write_s, read_s = plain_io(os.path.join(tmp, "plain.bin"), nbytes, cold)
            _, warm_read_s = plain_io(os.path.join(tmp, "plain.bin"), nbytes, False)
    gb = nbytes / 1e9
    print(f"{args.model} {args.layout} lora_rank {args.lora_rank}: checkpoint {gb:.2f} GB")
    print(f"save {gb / save_s:.2f} GB/s vs plain sequential write {gb / write_s:.2f} GB/s: "
          f"ratio {write_s / save_s:.2f}x")
    where = "from disk (page cache dropped)" if cold else "page cache not droppable: from memory"
    print(f"load {gb / load_s:.2f} GB/s vs plain sequential read {gb / read_s:.2f} GB/s, {where}: "
          f"ratio {read_s / load_s:.2f}x")
    print(f"load from the page cache {gb / warm_load_s:.2f} GB/s vs plain read from it {gb / warm_read_s:.2f} GB/s: "
          f"ratio {warm_read_s / warm_load_s:.2f}x (CRC-32C of every byte, then one copy)")


if __name__ == "__main__":
    sys.exit(main())
