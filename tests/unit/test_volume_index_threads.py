"""The HTTP thread reads the index's counts while the loop changes it."""
import os
import sys
import threading

from tapio_node.volumes import VolumeIndex

PLUGINS = {"kubernetes.io~secret": "secret"}


def _pod(root, uid):
    vol = os.path.join(root, uid, "volumes", "kubernetes.io~secret", "certs")
    os.makedirs(vol)
    with open(os.path.join(vol, "tls.key"), "w") as f:
        f.write("k")
    return os.path.join(root, uid)


def test_counts_are_safe_to_read_from_another_thread(tmp_path):
    import shutil

    root = str(tmp_path)
    for i in range(300):
        _pod(root, f"{i:08d}-0000-0000-0000-000000000000")
    index = VolumeIndex(root, PLUGINS, maps=None)
    index.scan_all()
    errors, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            try:
                index.pod_count, index.file_count, len(index.volumes)
            except Exception as exc:  # noqa: BLE001  (what the HTTP thread would hit)
                errors.append(exc)
                return
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for round_ in range(6):
            extra = [_pod(root, f"{round_:04d}{i:04d}-1111-0000-0000-000000000000") for i in range(100)]
            index.scan_all()
            for path in extra:
                shutil.rmtree(path)
            index.scan_all()
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(old)
        index.close()
    assert errors == []
    assert index.pod_count == 300
