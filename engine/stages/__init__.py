"""One file per pruning method, each implementing `engine.stage.BlockStage`."""
