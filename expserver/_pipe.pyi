"""Stub of the compiled pipes (ext/expserver/_pipe.pyx); used from Cython only."""

class FileSegment: ...

class Pipe:
    size: int
    threshold: int
    sent: int
    def __init__(self, threshold: int = ...) -> None: ...
