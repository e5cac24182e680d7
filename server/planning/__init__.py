"""Planning a job, with no Ray and no gRPC: checking and shape inference (``prepare``), the cost
model (``cost``), partitioning (``partition``), pipeline schedules (``schedule``) and splitting the
batch into micro-batches (``batching``)."""
