"""The shard-making job in pieces, each with one job (`pipelines.driver` is the front door):

- `config`: what a job is asked to do (JobConfig, Task, JobError);
- `units`: the plan, i.e. the opened source, the manifest config and the work units;
- `clips`: making a unit's clips (what a worker process runs);
- `records`: shards and part records on storage, resumption, stale temporaries, merging;
- `pool`: worker processes and the clip counter behind the progress bar;
- `run`: run_job, tying them together for listed sources and for streamed archives.

What differs between source kinds is data in `pipelines.kinds`, never a branch here.
"""
