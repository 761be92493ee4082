"""Former home of `fedimg_core.atomic` (atomic writes, bounded small-file reads); re-exported here."""

from fedimg_core.atomic import SMALL_FILE_LIMIT, FileReadError, default_mode, read_small_file, write_bytes, write_json, write_text

__all__ = ["SMALL_FILE_LIMIT", "FileReadError", "default_mode", "read_small_file", "write_bytes", "write_json", "write_text"]
