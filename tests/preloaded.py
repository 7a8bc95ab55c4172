"""What the command launcher's fork server imports once (tests.launch), so that every command
process it starts begins with torch, transformers and the recipes already loaded.

Only imports: the server must stay single-threaded and hold no state a command could see.
"""
import torch  # noqa: F401
import transformers.models.bert.modeling_bert  # noqa: F401

import umt_fast.data.dataset  # noqa: F401
import umt_fast.recipes.finetune  # noqa: F401
import umt_fast.recipes.finetune_qa  # noqa: F401
import umt_fast.recipes.pretrain  # noqa: F401
import umt_fast.recipes.pretrain_vl  # noqa: F401
