"""`vlm batch`: describe a whole collection into one output file, locally or on Ray.

    sources.py   INPUT arguments (files, folders, globs, URLs, object-store URIs, manifests)
                 -> rows: id, image as written, where to read it, the row's prompt
    fetch.py     a row's image bytes (a file, http(s), s3:// gs:// ... through pyarrow),
                 read ahead of the model in a background thread
    records.py   what one output row holds (an answer or an error), and its Parquet schema
    describer.py one model loaded once, describing one row at a time: the same answer
                 `vlm describe` gives for that image alone; a bad row is a record, not a crash
    output.py    JSONL (append, flush per row) and Parquet (a journal, merged at the end by
                 rename) outputs, and --resume: which ids are already there
    local.py     the job on this machine, rows in input order, with progress
    on_ray.py    the same job on Ray Data: an actor pool, each actor holding one model
"""
