//! Black-box tests of the runtime commands: run, send, queues, exceptions.
