"""The machine a run executes on: processes (`distributed`), stop signals (`signals`),
device meshes and the logical-axis rules (`sharding`), atomic files and host memory."""
