"""Helpers shared by training, evaluation, export and diffusion: files, dtypes, recipe schemas.

* ``orthoft.io.files``: the one staged writer (write to a hidden folder, fsync, rename) and
  atomic single-file writes.
* ``orthoft.io.dtypes``: the one dtype table and resolver.
* ``orthoft.io.schema``: the one YAML schema checker (dataclass sections, adapter sections).
"""
