"""Planning and orchestration: turning a model and feeds into a job, running it on an engine
(inline, or partitioned over Ray actors), and the gRPC service on top."""
