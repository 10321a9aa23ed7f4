from vae_anomaly.launch import main

main()
