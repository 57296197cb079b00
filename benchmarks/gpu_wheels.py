"""Fill .whl/ with the wheels that benchmarks/gpu_check.sh installs on a GPU machine whose image has torch but not
the rest of this project's packages (the workplace's device machines: Python 3.12, torch, transformers, pyarrow,
pandas, numpy, aiohttp, grpcio ... are there; Ray, DeepSpeed, soundfile, soxr, pydantic and Ray's smaller
dependencies are not). What travels to such a machine is limited (64 MiB with the repository), so Ray's wheel
(79 MB) is repacked without its Java jars, RLlib, Serve, LLM and the dashboard's JavaScript bundle, compressed
with LZMA (31 MB; pip installs it as any wheel). DeepSpeed is published as a source archive only: it is built
into a pure-Python wheel here (its CUDA ops are compiled on first use, if ever; we use torch's fused AdamW).

    python benchmarks/gpu_wheels.py [--out .whl --python-version 3.12]
Needs the package registry (pip download) and this project's venv (to build DeepSpeed's wheel).
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

RAY = "2.60.0"
DEEPSPEED = "0.19.8"
# Missing on the device image (its list: /work/.library/device/KINDS.md); versions as pip resolves them for
# ray[default,train,tune,data], soundfile and soxr (the project's pins where it has them).
EXTRA = ["soundfile==0.14.0", "soxr==1.1.0", "hjson", "pydantic>=2.5,<3", "annotated-types", "typing-inspection",
         "pydantic-core", "cffi", "pycparser", "tensorboardX", "colorful", "aiohttp-cors", "opencensus",
         "opencensus-context", "google-api-core", "google-auth", "googleapis-common-protos", "proto-plus", "pyasn1",
         "pyasn1-modules", "smart-open", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py",
         "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-semantic-conventions", "opentelemetry-proto",
         "opentelemetry-exporter-prometheus", "tzdata"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
DROP = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")


def download(specs: list[str], dest: Path, python_version: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", python_version, "-d", str(dest), *[f"--platform={p}" for p in PLATFORMS], *specs]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def slim_ray(wheel: Path, out: Path) -> Path:
    """Ray's wheel without what a training job does not import, LZMA-compressed, with a RECORD that matches."""
    dest = out / wheel.name
    record = f"ray-{RAY}.dist-info/RECORD"
    rows = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_LZMA) as dst:
        for info in src.infolist():
            name = info.filename
            if name == record or name.startswith(DROP) or name.endswith(".js.map") or (
                    name.startswith("ray/dashboard/client/build/") and info.file_size > 50_000):
                continue  # the dashboard needs its build folder to exist, not its JavaScript
            data = src.read(info)
            entry = zipfile.ZipInfo(name, info.date_time)
            entry.external_attr, entry.compress_type = info.external_attr, zipfile.ZIP_LZMA
            dst.writestr(entry, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((name, f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows + [(record, "", "")])
        dst.writestr(record, buf.getvalue())
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".whl")
    p.add_argument("--python-version", default="3.12", help="the device's Python")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        download([f"ray=={RAY}"], tmp, args.python_version)
        slim_ray(next(tmp.glob("ray-*.whl")), out)
        download(EXTRA, out, args.python_version)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                        f"deepspeed=={DEEPSPEED}"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
    total = sum(f.stat().st_size for f in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels in {out}, {total / 2 ** 20:.1f} MiB")


if __name__ == "__main__":
    main()
