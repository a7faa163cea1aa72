"""The old path ``clipdistill.engine.class_vectors``: a re-export shim, kept for one release.

Import from ``clipdistill.engine.models.class_vectors`` instead.
The module was: Class vectors: text features of class names x templates, computed once and cached on disk.
"""
from clipdistill.engine.models.class_vectors import (FORMAT_VERSION, TENSOR_NAME, ClassVectorKey,
                                                     ClassVectorKeyMismatch, TextEncoder, Tokenizer, cache_path_for,
                                                     cached_class_vectors, encode_class_names, load_class_vectors,
                                                     log, save_class_vectors, teacher_class_vectors,
                                                     weights_fingerprint)

__all__ = ["ClassVectorKey", "ClassVectorKeyMismatch", "FORMAT_VERSION", "TENSOR_NAME", "TextEncoder", "Tokenizer",
           "cache_path_for", "cached_class_vectors", "encode_class_names", "load_class_vectors", "log",
           "save_class_vectors", "teacher_class_vectors", "weights_fingerprint"]
