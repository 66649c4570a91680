"""SAM-MI on CAT-Seg: TSPP point prompts, SAM proposals, SMAgg class masks, DMI mask injection."""
