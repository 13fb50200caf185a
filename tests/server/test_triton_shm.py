"""triton_shm.py and its use by triton_http.py: a worker's shared memory region is reserved only
once Triton takes it, cut into blocks per call, and a call whose region Triton does not know (it
restarted) goes in the HTTP body; against an aiohttp stand-in of Triton that reads the region as
Triton would."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton_http
from aiohttp import web
from iei.contract import STUB_REGIONS
from iei.launcher.processes import remove_stale_regions
from iei.server import metrics, triton_shm
from iei.server.triton_http import FilesInput, TritonHttpClient
from iei.server.triton_shm import SharedMemoryRegion
from stack import aiohttp_stand_in

pytestmark = pytest.mark.anyio
FILES = [b"\xff\xd8first", b"", b"third file" * 1000]
MIB = 2**20


@pytest.fixture
def anyio_backend():
    return "asyncio"


class Registrar:
    """Triton's registration calls, taking regions or refusing them."""

    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.calls: list[tuple[str, str]] = []

    async def register_system_shared_memory(self, name: str, key: str, byte_size: int) -> None:
        self.calls.append(("register", name))
        if not self.accept:
            raise RuntimeError(f"Unable to open shared memory region: '{key}'")

    async def unregister_system_shared_memory(self, name: str = "") -> None:
        self.calls.append(("unregister", name))


def reserved_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


async def test_a_refused_region_reserves_no_memory_and_is_offered_again_later(
    tmp_path, monkeypatch
):
    region = SharedMemoryRegion(8 * MIB, tmp_path)
    triton = Registrar(accept=False)
    assert not await region.ready(triton)
    assert reserved_bytes(region.path) == 0  # sparse: Triton never saw it
    assert not await region.ready(triton)  # within RETRY_AFTER: not asked again
    assert triton.calls.count(("register", region.name)) == 1
    monkeypatch.setattr(triton_shm, "RETRY_AFTER", 0.0)
    triton.accept = True
    assert await region.ready(triton)
    assert reserved_bytes(region.path) >= 8 * MIB  # Triton took it: the pages are reserved
    await region.close(triton)
    assert not region.path.exists()
    assert triton.calls[-1] == ("unregister", region.name)


async def test_without_room_in_dev_shm_the_region_is_given_up_and_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(triton_shm, "MAX_SHARE_OF_FREE", 1e-12)
    region = SharedMemoryRegion(8 * MIB, tmp_path)
    triton = Registrar()
    assert not await region.ready(triton)
    assert region.disabled and not region.path.exists()
    assert triton.calls[-1] == ("unregister", region.name)
    assert not await region.ready(triton)  # off for good
    assert triton.calls.count(("register", region.name)) == 1


async def test_blocks_are_cut_first_fit_aligned_and_given_back(tmp_path):
    region = SharedMemoryRegion(4096, tmp_path)
    assert await region.ready(Registrar())
    first = region.write([b"a" * 100, b"b" * 20])
    second = region.write([b"c" * 1000])
    assert (first, second) == (0, 128)  # the next cache line
    assert region.write([b"d" * 4000]) is None  # no block that large is free
    region.release(first)
    assert region.write([b"e" * 120]) == 0  # the first gap that fits
    data = region.path.read_bytes()
    assert data[:120] == b"e" * 120 and data[128:1128] == b"c" * 1000
    region.release(0)
    region.release(second)
    assert region.blocks_in_use == 0
    assert region.write([b"f" * 4096]) == 0
    region.release(0, later=0.05)  # Triton may still read it: taken a while longer
    assert region.blocks_in_use == 1
    await asyncio.sleep(0.1)
    assert region.blocks_in_use == 0
    await region.close(None)


def test_regions_of_workers_no_longer_running_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f"{triton_shm.PREFIX}{dead}-00000000"
    mine = tmp_path / f"{triton_shm.PREFIX}{os.getpid()}-00000000"
    other = tmp_path / "psm_12345"
    for path in (stale, mine, other):
        path.write_bytes(b"x")
    remove_stale_regions(triton_shm.PREFIX, tmp_path)
    assert not stale.exists() and mine.exists() and other.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_user_s_regions_are_left_alone(tmp_path):
    """/dev/shm is sticky: unlinking another user's region raised PermissionError, which stopped
    a start (or kept a restart failing), and a pid says nothing across users anyway."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    theirs = tmp_path / f"{STUB_REGIONS}{dead}-iei_0_0"
    theirs.write_bytes(b"x")
    os.chown(theirs, 65534, 65534)
    remove_stale_regions(STUB_REGIONS, tmp_path)
    assert theirs.exists()


def test_a_zombie_s_regions_are_stale_too(tmp_path):
    """A worker killed with its supervisor is a zombie until whoever inherits it reaps it, and
    kill(pid, 0) still found it: its regions stayed after `iei serve` stopped."""
    import time

    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # exited, not reaped
    region = tmp_path / f"{triton_shm.PREFIX}{zombie.pid}-00000000"
    region.write_bytes(b"x")
    remove_stale_regions(triton_shm.PREFIX, tmp_path)
    assert not region.exists()
    zombie.wait()


def test_the_stub_regions_of_a_killed_launcher_are_removed_by_the_next_one(tmp_path):
    """Triton's stubs name theirs `iei-<launcher pid>-…`: a launcher killed outright left them."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f"{STUB_REGIONS}{dead}-iei_0_0"
    mine = tmp_path / f"{STUB_REGIONS}{os.getpid()}-iei_0_0"
    workers = tmp_path / f"{triton_shm.PREFIX}{dead}-00000000"  # not the launcher's to judge
    for path in (stale, mine, workers):
        path.write_bytes(b"x")
    remove_stale_regions(STUB_REGIONS, tmp_path)
    assert not stale.exists() and mine.exists() and workers.exists()


async def test_a_call_names_its_block_and_a_restarted_triton_gets_the_files_in_the_body(
    tmp_path,
):
    """The stand-in reads the named block from the region's file (as Triton maps it); after it
    has forgotten the region (a restart), the call is sent again with the files in the body and
    the next one registers the region again."""
    served = [tmp_path / "unused"]
    seen: list[dict[str, object]] = []
    known: set[str] = set()
    vectors = np.arange(6, dtype=np.float32).reshape(3, 2)
    expected = b"".join(FilesInput("IMAGE", FILES).parts())

    async def register(request: web.Request) -> web.Response:
        known.add(request.match_info["name"])
        served[0] = Path("/dev/shm") / (await request.json())["key"].lstrip("/")
        return web.json_response({})

    async def unregister(request: web.Request) -> web.Response:
        known.discard(request.match_info["name"])
        return web.json_response({})

    async def infer(request: web.Request) -> web.Response:
        length = int(request.headers["Inference-Header-Content-Length"])
        body = await request.read()
        header = json.loads(body[:length])
        parameters = header["inputs"][0]["parameters"]
        if "shared_memory_region" in parameters:
            name = parameters["shared_memory_region"]
            if name not in known:
                message = f"Unable to find system shared memory region: '{name}'"
                return web.json_response({"error": message}, status=400)
            start, size = parameters["shared_memory_offset"], parameters["shared_memory_byte_size"]
            data = served[0].read_bytes()[start : start + size]
            assert len(body) == length  # the files are not in the body
        else:
            data = body[length:]
        seen.append({"shared": "shared_memory_region" in parameters, "data": data == expected})
        out = json.dumps({"outputs": [{
            "name": "EMBEDDING", "datatype": "FP32", "shape": [3, 2],
            "parameters": {"binary_data_size": vectors.nbytes},
        }]}).encode()  # fmt: skip
        return web.Response(
            body=out + vectors.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(out))},
            content_type="application/octet-stream",
        )

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v2/systemsharedmemory/region/{name}/register", register)
    app.router.add_post("/v2/systemsharedmemory/region/{name}/unregister", unregister)
    app.router.add_post("/v2/models/{model}/infer", infer)
    async with aiohttp_stand_in(app) as triton:
        region = SharedMemoryRegion(1 * MIB)
        client = TritonHttpClient(triton, shared_memory=region)
        wanted = [triton_http.InferRequestedOutput("EMBEDDING", binary_data=True)]
        shared = metrics.TRITON_FILE_CALLS.labels("shared_memory")
        before = shared._value.get()
        try:
            for _ in range(2):
                result = await client.infer("iei", [FilesInput("IMAGE", FILES)], outputs=wanted)
                np.testing.assert_array_equal(result.as_numpy("EMBEDDING"), vectors)
            known.clear()  # Triton restarted
            result = await client.infer("iei", [FilesInput("IMAGE", FILES)], outputs=wanted)
            np.testing.assert_array_equal(result.as_numpy("EMBEDDING"), vectors)
            await client.infer("iei", [FilesInput("IMAGE", FILES)], outputs=wanted)
            assert region.blocks_in_use == 0
        finally:
            await region.close(client)
            await client.close()
    assert seen == [
        {"shared": True, "data": True},
        {"shared": True, "data": True},
        {"shared": False, "data": True},  # the call Triton refused, again in the body
        {"shared": True, "data": True},  # registered again
    ]
    assert shared._value.get() - before == 3
    assert not region.path.exists()
