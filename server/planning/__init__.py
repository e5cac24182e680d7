"""Planning a job, with no Ray and no gRPC: checking and shape inference (``prepare``), the cost
model (``cost``), the memory model (``memory``), partitioning (``partition``), pipeline schedules
(``schedule``), splitting the batch into micro-batches (``batching``) and choosing partitions,
micro-batches and replicas when asked for ``auto`` (``auto``)."""
