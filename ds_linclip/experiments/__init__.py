"""Experiments: studies that train grids of small CLIPs with our trainer, score them with our eval job
and write their results under docs/results/.

A study is one thin module (`compare`, `linearize`, `frontier`, ...) with a CLI on top of shared pieces:

    variants  VARIANT_GRAMMAR, parse_variant(name) -> Variant (.image/.text AttentionSpec, .linear,
              .overrides()), VariantError, variant_argument (argparse type), HEAD_DIM (heads = width / 32)
    runs      Budget (what every run shares: steps, batch_size, seed, lr, weight_decay, layers, patch_size,
              context_length, eval_* ; warmup_steps = steps // 10, log_every = steps // 40),
              RunSpec(kind, image_size, width, budget, overrides=(), label="") -> .name (the run folder,
              `<kind>-<px>px-w<width>[-<label>]-<steps>steps-seed<seed>`), .shape_name, .tokens,
              .with_seed(s), .with_steps(n), .model_overrides(), .train_overrides(data_dir, runs_dir),
              .eval_overrides(data_dir); run_one(spec, launcher, train=True, evaluate=True) -> RunResult
              (trains unless `same_config(run_dir, overrides)` says a finished run matches, scores unless
              scored, reads the numbers back); RunResult (.final_loss, .loss_curve [(step, loss)], .loss_at(step),
              .loss_vs_compute(), .flops_per_step, .train_flops, .top1/.top5, ...); read_scalars(tensorboard_dir)
              -> {tag: [(step, value)]}, read_curve(run_dir, tag="train/loss"), window_mean_loss, tail_mean_loss,
              median_window_rate; model_cost_of(spec); the FLOPs of a run as the trainer plans it:
              phase_flops(spec) [(steps, FLOPs per step)] per train.phases entry (image size, patch dropout),
              train_flops(spec) their sum, train_flops_per_step(spec) for a one-phase run;
              parse_seeds, ensure_shards(data_dir), log / set_log_prefix, ExperimentError, MissingRun
    launcher  Launcher(mode "subprocess"|"inprocess", runs_dir, data_dir, reuse_any_finished=False) (.train(spec),
              .evaluate(spec)); run_specs(specs, launcher, done, jobs=1, train=True, bar=None, evaluate=True) fills
              `done` {spec: RunResult}, `jobs` runs at a time (one thread each), returns failure messages;
              prepare_process(threads), run_study(body) (errors -> exit 1, child processes killed),
              parse_study_args(parser, argv, quick) -> (args, argv) (--quick fills what the line did not give),
              explicit_option(argv, option), failures_exit_code(failures) (1 with the failed runs on stderr, else 0),
              terminate_on_sigterm(), kill_live_processes(), child_env(), free_port()
    report    aggregate(specs, done) -> [Row] (one per spec with its seed left out; Row.stat(field) -> Stat,
              .seeds_cell(), .summary()); mean_std(values) -> Stat(mean, std, n) (.cell() 'mean ± std (n)');
              markdown_table(header, rows), parse_markdown_table(text, first_header); fmt(value, spec);
              run_meta() {date, commit, machine}, machine_sentence(meta), load_average_1m(), git_commit(),
              write_json(path, payload)
    plots     plot_loss(rows, path), plot_accuracy_vs_compute(rows, timing, path), plot_throughput(rows, timing,
              path), plot_scaling(results, fits, path), plot_sweep(sweep, path) (each takes title=...);
              color(kind), pyplot(), style_axes(ax, ...), save(fig, path)
    fits      fit_power_law(compute, loss) -> {exponent, coefficient, r2, points}; power_law(compute, fit)
              = E + A * C^-alpha (E = fit.get("irreducible", 0)); bootstrap(fit_fn, compute, loss, resamples,
              level, seed) -> {param: (low, high)}; lower_envelope(points) (the compute frontier)
    timing    interleaved_timing(specs, rounds, batch_size) -> {shape_name: {activation_mib, seconds,
              images_per_s, batch_size}}; time_alternating(steps, rounds), synthetic_batch(batch, px, context),
              saved_activation_bytes(step, params), contrastive_loss(image_features, text_features, scale)

What a study module writes:
1. its grid: a list of RunSpecs. Settings shared by the grid go in a Budget; anything else is a config
   override on the spec, applied after everything the spec sets so it wins (e.g.
   `overrides=("model.image.patch_dropout=0.5",), label="pd0.5"`, or `("train.lr=1e-3",
   "train.warmup_steps=50")`). Give a readable `label` (it enters the run folder's name; without one a
   spec with overrides is labelled with a hash of them). Do not override train.output_dir/run_name.
   Seeds are specs that differ only in budget.seed (`spec.with_seed(s)`); order the grid seed-major so
   a stopped run leaves every row with the same number of seeds.
2. fill it: `launcher = Launcher(mode, runs_dir, ensure_shards(data_dir))`, `done = {}`,
   `failures = run_specs(grid, launcher, done, jobs=N, train=not no_train)`. Finished runs whose saved
   config resolves to the same config are reused, so a later run of the same command fills only what
   is missing; `train=False` reports only what has finished.
3. report: `rows = aggregate(grid, done)` (mean ± std (n) over seeds), `markdown_table`, plots and fits,
   `{"command": ..., **run_meta(), ...}` through `write_json`, all under docs/results/ (--out).
   Intermediate losses come from RunResult.loss_curve / loss_at(step) / loss_vs_compute(), or any other
   TensorBoard tag through read_curve(runs_dir / spec.name, tag).
The CLI: `main(argv)` = `set_log_prefix(name)`, `prepare_process(threads)`, `return run_study(lambda: ...)`.
`frontier` adds `steps_for_flops(spec, flops)` (over train.phases and patch dropout), `pareto_frontier(points)`
and `compute_to_reach_accuracy(curve, target)` /
`compute_ratio_at_accuracy` (linear's compute over softmax's: < 1 means linear needs less). `fits` has the
loss-side pair: `compute_to_reach_loss(frontier, target)` on a measured envelope and `fit_compute_multiplier`
(reference's compute over the other's, from two fitted laws: > 1 means the other needs less).
"""
