from common.devices import cpu_for_deepspeed_without_a_gpu

cpu_for_deepspeed_without_a_gpu()  # before accelerate imports DeepSpeed

from finetune.run import main  # noqa: E402

raise SystemExit(main())
