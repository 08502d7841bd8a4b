"""replay: the auditors' tool for l4proxy session recordings.

Never imports trio or the gateway's async layers (a test asserts it): auditors run it on
their own machines against untrusted files.
"""

__version__ = "0.1.0"
