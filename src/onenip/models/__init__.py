"""The network and what runs it: the frozen backbone, the transformer, the reconstruction networks (OneNIP, UniAD,
static prompt), prompt retrieval, the detector (backbone + network + configuration), the deployment it carries and
the one inference path (`inference`)."""
