"""The bookkeeping around common.py's training core: run folders, resumes and locks, image files and the
streamed pipeline, torchrun, weight files and the teacher cache, flags, progress and stop lines. A reader of
the methods may skip this folder; only common.py imports it."""
