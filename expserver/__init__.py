"""expserver: an nginx-class web server with a Cython core that runs eXpServer's configs."""

__version__ = "0.1.0"
