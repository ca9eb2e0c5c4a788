"""Where a GPU session ran: device, driver, torch, triton, CUDA, cuDNN and NCCL versions.

    python bench/gpu_env.py [--out DIR]     # prints them and saves DIR/environment.json

On a machine without a GPU it says so and saves what there is (the dry run of
bench/gpu_session.sh). Not a benchmark.
"""
import json
import shutil
import subprocess

import torch

import _common as C


def nvidia_smi(query):
    """One field of ``nvidia-smi --query-gpu`` (None where there is no nvidia-smi or it fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                            capture_output=True, text=True, timeout=20)
    return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None


def describe():
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = C.environment(device, quick=not cuda)
    info.pop("note", None)
    info.pop("timing", None)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update({
            "capability": f"sm_{props.major}{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "driver": nvidia_smi("driver_version"),
            "max_sm_clock_MHz": nvidia_smi("clocks.max.sm"),
            "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())),
            "gpus": torch.cuda.device_count(),
        })
    return info


def main(argv=None):
    parser = C.base_parser(__doc__)
    args = parser.parse_args(argv)
    info = describe()
    for key, value in info.items():
        print(f"{key:>18}: {value}")
    out_dir = args.out or C.output_dir(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "environment.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved: {out_dir / 'environment.json'}")
    return info


if __name__ == "__main__":
    main()
