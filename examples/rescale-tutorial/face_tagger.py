"""The job of Rescale's HTC tutorial (face_tagger.py), with the standard library only.

Rescale's tutorial tags faces in 5,000 COCO images with OpenCV. This stand-in keeps the
tutorial's structure, command line and environment variables, and counts the word "face" in
text "images" instead, so the whole tutorial runs offline in a small python3 image
(docs/rescale-tutorial.md). Storage goes through ``htcctl``, as in the tutorial:

    HTC_INPUT_IMAGE=true  python face_tagger.py IMAGE   one image from project storage
    python face_tagger.py                                a chunk of $IMG_OBJKEY_LIST, by
                                                         $AWS_BATCH_JOB_ARRAY_INDEX of
                                                         $BATCH_JOB_ARRAY_SIZE jobs

For an image with faces it uploads ``IMAGE_tagged.dat`` ("face_cnt\\nN") and
``IMAGE_tagged.jpg`` to task storage. With ``SIMULATE_FAILURES`` set, some jobs raise and some
hang (to hit execTimeoutSeconds); unlike the tutorial's random choice, the job index decides,
so a run is reproducible: index % 4 == 1 raises, index % 4 == 3 hangs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def face_detect(image_path):
    start = time.time()
    with open(image_path) as f:
        text = f.read()
    faces = text.split().count("face")
    img_file_path = f"{image_path}_tagged.jpg"
    dat_file_path = f"{image_path}_tagged.dat"
    if faces > 0:
        with open(img_file_path, "w") as f:
            f.write(text.replace("face", "[face]"))
        with open(dat_file_path, "w") as f:
            f.write(f"face_cnt\n{faces}")
    print(f"{image_path}: Found {faces} faces in {time.time() - start:.4f} seconds.")
    return faces, img_file_path, dat_file_path


def _call_htcctl(cmd, project_shared):
    if project_shared:
        cmd.insert(1, "-s")
    p = subprocess.run(cmd)
    if p.returncode != 0:
        sys.exit(os.EX_IOERR)


def upload_files(file_paths_list, project_shared=False):
    _call_htcctl(["htcctl", "upload", *file_paths_list], project_shared)


def download_files(object_keys_list, project_shared=False):
    _call_htcctl(["htcctl", "download", *object_keys_list], project_shared)


def htc_detect(input_image):
    download_files([input_image], project_shared=True)  # from project storage
    face_cnt, img_file_path, dat_file_path = face_detect(input_image)
    if face_cnt > 0:
        upload_files([img_file_path, dat_file_path])  # to task storage


def _chunks(lst, n):
    for i in range(0, len(lst), n):
        yield lst[i : i + n]


def htc_batch_detect(img_objkey_list, batch_index, batch_size, sim_fail):
    download_files([img_objkey_list], project_shared=True)
    with open(img_objkey_list) as f:
        image_names = [line.strip() for line in f if line.strip()]
    chunks = list(_chunks(image_names, max(1, len(image_names) // batch_size)))
    if sim_fail and batch_index % 4 == 1:
        raise Exception("Simulated exception")
    if sim_fail and batch_index % 4 == 3:
        time.sleep(3600)  # to simulate execTimeout
    for img_file in chunks[batch_index]:
        htc_detect(img_file)


if __name__ == "__main__":
    if "SHOW_ENV" in os.environ:
        for name, value in os.environ.items():
            print(f"{name}: {value}")
    if "HTC_INPUT_IMAGE" in os.environ:
        htc_detect(sys.argv[1])
    elif len(sys.argv) == 1:
        htc_batch_detect(
            os.environ["IMG_OBJKEY_LIST"],
            int(os.environ["AWS_BATCH_JOB_ARRAY_INDEX"]),
            int(os.environ["BATCH_JOB_ARRAY_SIZE"]),
            "SIMULATE_FAILURES" in os.environ,
        )
    else:
        face_detect(sys.argv[1])
